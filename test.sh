#!/usr/bin/env bash
# Set up (first run only) and run the tests; the MNIST tests fail, not skip, without the data
# ($MNIST_DATA_DIR, else ./data), in one process per core (up to 4: pytest-xdist). Arguments go to
# pytest: ./test.sh -m "not slow" runs the fast ones.
source "$(dirname "$0")/setup.sh"
REQUIRE_MNIST=1 python -m pytest -q -n auto --maxprocesses 4 "$@"
