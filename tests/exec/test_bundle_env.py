"""What a process started by the single-file build gets of its environment
(populi_peer.exec._env.outside_env): none of the loader's variables, the saved originals
back. The running file itself is checked in tests/binary/."""

from __future__ import annotations

from populi_peer.exec._env import outside_env

BUNDLE = "/tmp/_MEI0000123abc"


def test_not_frozen_is_unchanged() -> None:
    env = {"LD_LIBRARY_PATH": "/opt/x", "_PYI_ARCHIVE_FILE": "/usr/bin/populi"}
    assert outside_env(env, None) == env


def test_saved_value_comes_back_and_the_loader_variables_go() -> None:
    env = {
        "LD_LIBRARY_PATH": f"{BUNDLE}:/opt/cuda/lib64",
        "LD_LIBRARY_PATH_ORIG": "/opt/cuda/lib64",
        "_PYI_ARCHIVE_FILE": "/usr/local/bin/populi",
        "_PYI_APPLICATION_HOME_DIR": BUNDLE,
        "_PYI_PARENT_PROCESS_LEVEL": "1",
        "_MEIPASS2": BUNDLE,
        "PYINSTALLER_RESET_ENVIRONMENT": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
    }
    assert outside_env(env, BUNDLE) == {
        "LD_LIBRARY_PATH": "/opt/cuda/lib64",
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
    }


def test_a_variable_the_loader_set_from_nothing_goes() -> None:
    env = {
        "LD_LIBRARY_PATH": BUNDLE,
        "OPENSSL_MODULES": f"{BUNDLE}/ossl-modules",
        "LANG": "C.UTF-8",
    }
    assert outside_env(env, BUNDLE + "/") == {"LANG": "C.UTF-8"}


def test_look_alike_paths_and_unrelated_orig_variables_stay() -> None:
    env = {
        "DATA": f"{BUNDLE}-other/x",  # a sibling folder, not the bundle
        "EDITOR_ORIG": "vi",  # somebody else's _ORIG
        "LD_LIBRARY_PATH": "/opt/x",  # not the loader's
        "LD_LIBRARY_PATH_ORIG": "/opt/y",
    }
    assert outside_env(env, BUNDLE) == env
