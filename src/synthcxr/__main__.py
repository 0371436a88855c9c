"""`python -m synthcxr` (used by `accelerate launch -m synthcxr ...`)."""

from synthcxr.cli import main

if __name__ == "__main__":
    main()
