"""Every verb of the console script answers --help."""
import subprocess
import sys

import pytest

from medddpm.cli import build_parser


def _verbs():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_top_level_help():
    out = subprocess.run([sys.executable, "-m", "medddpm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "validate" in out.stdout


@pytest.mark.parametrize("verb", _verbs())
def test_every_verb_has_help(verb):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([verb, "--help"])
    assert e.value.code == 0


def test_verify_verb_and_wait_flags():
    """`medddpm verify` exists; the verbs that own an output folder take --wait (issue 32)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert "verify" in sub.choices
    for verb in ("study", "train", "synthesize"):
        assert "--wait" in sub.choices[verb].format_help(), verb
