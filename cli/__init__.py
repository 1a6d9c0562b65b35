"""The command line's own modules: the options both scripts share (options), where a run's files
go (outputs), the trained model cached by its settings (checkpoints), and what must be settled
before PyTorch is imported (startup). Importing the package imports none of them."""
