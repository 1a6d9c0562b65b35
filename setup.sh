# Sourced by run.sh and test.sh: a virtual environment in .venv with the pinned requirements, made
# on the first run and reused after (remade when the requirements change). PyTorch comes as its
# CPU build (about 1 GB) where PyTorch's CPU index can be reached, else from the default index
# (which brings CUDA libraries too, about 5 GB). uv installs them, from the indexes pip is set to
# use, compiled to bytecode as pip compiles them (where PYTHONDONTWRITEBYTECODE is set, every
# process would compile PyTorch's Python afresh: the suite a third slower): PyTorch's CUDA build
# and the rest took it 45 s on 2 cores, pip 106 s. pip installs them where uv cannot be had.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
wanted=$(cat requirements.txt requirements-test.txt | sha256sum | cut -c1-16)

pip_indexes() {  # pip's configured indexes and wheel folders, as uv's options
    .venv/bin/python -m pip config list 2>/dev/null | sed -nE "s/^[^=]*\.(index-url|extra-index-url|find-links)='(.*)'$/\1 \2/p" |
        while read -r option values; do
            for value in $values; do printf -- '--%s\n%s\n' "$option" "$value"; done
        done
}

if [ "$(cat .venv/requirements.sha 2>/dev/null)" != "$wanted" ]; then
    echo "setting up .venv (once; about a minute with uv, 2 with pip)" >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
    torch=$(grep -E '^torch(vision)?==' requirements.txt | sed 's/$/+cpu/')
    if "${pip[@]}" uv==0.13.10 2>/dev/null; then
        mapfile -t indexes < <(pip_indexes)
        install=(.venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python
                 --index-strategy unsafe-best-match)
        cpu_index=(env UV_HTTP_TIMEOUT=10 UV_HTTP_RETRIES=0 "${install[@]}")
        install+=("${indexes[@]}")
    else
        install=("${pip[@]}")
        cpu_index=("${pip[@]}" --timeout 10 --retries 0)
    fi
    # shellcheck disable=SC2086
    if ! "${cpu_index[@]}" --index-url https://download.pytorch.org/whl/cpu $torch 2>/dev/null; then
        echo "PyTorch's CPU index cannot be reached: installing PyTorch from the default index" >&2
    fi
    "${install[@]}" -r requirements-test.txt
    "${pip[@]}" --no-deps -e .  # the library, importable from any folder
    echo "$wanted" > .venv/requirements.sha
fi
export PATH="$PWD/.venv/bin:$PATH"
