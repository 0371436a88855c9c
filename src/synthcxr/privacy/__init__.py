"""Privacy: patient re-identification (a Siamese verification network) for synthetic chest X-rays."""
