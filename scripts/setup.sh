#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in <repo>/.venv. Idempotent; well under 2 s when nothing
# changed.
#
#   scripts/setup.sh                  # the package and its runtime dependencies
#   scripts/setup.sh dev              # ... plus the [dev] extras (pytest, ruff); several extras: "dev,serve"
#   source scripts/setup.sh dev       # the same from another bash script (never exits the calling shell; pass the
#                                     # extras explicitly, or "" for none, since `source` otherwise passes yours)
#
# torch is installed first when .venv does not have it: $CHRONOEDIT_TORCH if set (pip arguments, e.g.
# "torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"), else the CUDA build from PyPI when nvidia-smi
# works, else torch==2.13.0 (the CPU build where a local wheel provides it, as on our CI; PyPI's Linux wheel of that
# version bundles CUDA and also runs on the CPU). The package is then installed in editable mode, again only when pyproject.toml or the
# requested extras changed since the last install (stamp: .venv/.chronoedit-install-stamp).

_chronoedit_setup() {
    local root venv extras stamp key state
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    venv="$root/.venv"
    extras="${1:-}"
    stamp="$venv/.chronoedit-install-stamp"

    # A venv without a working pip (e.g. python3-venv missing when it was made) is rebuilt, not trusted.
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$venv"
        _chronoedit_make_venv "$venv" || return 1
    fi
    # One interpreter start: which of torch / chronoedit can be found (without importing them).
    state="$("$venv/bin/python" -c 'import importlib.util as u; print(*(int(u.find_spec(m) is not None) for m in ("torch", "chronoedit")))')" \
        || { echo "setup: error: $venv/bin/python does not run; delete $venv and run again" >&2; return 1; }
    if [ "${state%% *}" != 1 ]; then
        _chronoedit_install_torch "$venv" || return 1
    fi

    key="$(cksum <"$root/pyproject.toml" | cut -d' ' -f1,2)"
    if [ "${state##* }" = 1 ] && [ -f "$stamp" ] && grep -qxF "$key extras=$extras" "$stamp"; then
        return 0
    fi
    local target="$root"
    if [ -n "$extras" ]; then target="$root[$extras]"; fi
    echo "setup: installing chronoedit${extras:+[$extras]} and its dependencies into .venv" >&2
    _chronoedit_pip "$venv" install -e "$target" \
        || { echo "setup: error: pip install -e \"$target\" failed" >&2; return 1; }
    # Remember this install (an install with extras also provides the plain package); drop stamps of old pyprojects.
    {
        echo "$key extras=$extras"
        echo "$key extras="
        if [ -f "$stamp" ]; then grep -F "$key extras=" "$stamp" || true; fi
    } | sort -u >"$stamp.new" && mv -f "$stamp.new" "$stamp"
    return 0
}

_chronoedit_pip() {
    # pip, quiet; errors stay visible, only the warnings about absent local index folders (file://...) are dropped.
    local venv="$1" status
    shift
    {
        "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 1>&3 3>&- \
            | { grep -v "^WARNING: Location 'file:" >&2 || true; }
        status=${PIPESTATUS[0]}
    } 3>&1
    return "$status"
}

_chronoedit_make_venv() {
    local venv="$1" candidate
    for candidate in python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
            echo "setup: creating .venv with $("$candidate" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
            "$candidate" -m venv "$venv" && "$venv/bin/python" -m pip --version >/dev/null 2>&1 && return 0
            rm -rf "$venv"
            echo "setup: error: '$candidate -m venv $venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2
            return 1
        fi
    done
    echo "setup: error: Python >= 3.10 not found (tried python3.12, python3.11, python3.10, python3)" >&2
    return 1
}

_chronoedit_install_torch() {
    local venv="$1" spec
    if [ -n "${CHRONOEDIT_TORCH:-}" ]; then
        spec="$CHRONOEDIT_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        spec="torch>=2.4"
    else
        spec="torch==2.13.0"
    fi
    echo "setup: installing $spec into .venv (first run only)" >&2
    # shellcheck disable=SC2086  # CHRONOEDIT_TORCH may hold several pip arguments
    if _chronoedit_pip "$venv" install $spec; then
        if [ "$spec" = "torch>=2.4" ] && ! "$venv/bin/python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
            echo "setup: warning: nvidia-smi works but the installed torch cannot use the GPU (driver too old for" \
                "its CUDA build?); set CHRONOEDIT_TORCH to a matching build and delete .venv" >&2
        fi
        return 0
    fi
    echo "setup: error: installing torch ($spec) failed; set CHRONOEDIT_TORCH to pip arguments that work here" >&2
    return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    _chronoedit_setup "$@"
    exit $?
else
    _chronoedit_setup "$@"
fi
