#!/usr/bin/env bash
# Set up (first run only) and print both scripts' default tables. MNIST is read from
# $MNIST_DATA_DIR, else ./data.
source "$(dirname "$0")/setup.sh"
python zero_pruning.py "$@"
echo
python activation_pruning.py "$@"
