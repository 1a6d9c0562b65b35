# Sourced by run.sh and test.sh: a virtual environment in .venv with the pinned requirements, made
# on the first run and reused after (remade when the requirements change). PyTorch comes as its
# CPU build (about 1 GB) where PyTorch's CPU index can be reached, else from the default index
# (which brings CUDA libraries too, about 5 GB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
wanted=$(cat requirements.txt requirements-test.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/requirements.sha 2>/dev/null)" != "$wanted" ]; then
    echo "setting up .venv (once; about 1 to 3 minutes)" >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
    torch=$(grep -E '^torch(vision)?==' requirements.txt | sed 's/$/+cpu/')
    # shellcheck disable=SC2086
    if ! "${pip[@]}" --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu $torch 2>/dev/null; then
        echo "PyTorch's CPU index cannot be reached: installing PyTorch from the default index" >&2
    fi
    "${pip[@]}" -r requirements-test.txt
    "${pip[@]}" --no-deps -e .  # the library, importable from any folder
    echo "$wanted" > .venv/requirements.sha
fi
export PATH="$PWD/.venv/bin:$PATH"
