"""The command line's own modules, everything the entry points share: a run of either pruning
script and its one-line errors (run), the options (options), the training recipe they give
(recipe), what a row measures beyond accuracy (measured), the tables' text (tables), rows over
seeds as JSON and Markdown (results), where a run's files go (outputs) and the checks of every
destination before the work (destinations), the trained model cached by its settings
(checkpoints), what must be settled before PyTorch is imported (startup), progress lines
(progress) and the figures (plots). Importing the package imports none of them."""
