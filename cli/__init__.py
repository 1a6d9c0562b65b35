"""The command line's own modules: the options both scripts share (options), where a run's files
go (outputs), the trained model cached by its settings (checkpoints), what must be settled
before PyTorch is imported (startup), rows over seeds as JSON and Markdown tables (results), and
the figures (plots). Importing the package imports none of them."""
