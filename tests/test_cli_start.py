"""The command line answers at once: parsing, `--help` and argument or path errors import
neither torch, diffusers, faiss nor scikit-learn, and are refused before any work."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import pytest

from fastinf.cli import build_parser
from fastinf.config import STRATEGY_NAMES

from tiny import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["topk", "--help"]])
def test_help_imports_nothing_heavy(args):
    code, _, loaded = run_cli(*args)
    assert code == 0 and loaded == []


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "a_file").write_text("mine")
    (tmp / "curvature").mkdir()
    (tmp / "curvature" / "curvature.json").write_text("{}")
    (tmp / "weights").mkdir()
    (tmp / "weights" / "digits_unet.safetensors").write_text("mine")
    curvature = str(tmp / "curvature")
    return [
        (["topk", "--curvature", str(tmp / "none"), "--generate", "2"], "--curvature"),
        (["topk", "--curvature", curvature, "--queries", str(tmp / "q.npy")], "--queries"),
        (["topk", "--curvature", curvature, "--queries", str(tmp / "a_file")], "--queries"),
        (["topk", "--curvature", curvature, "--generate", "2", "--k", "0"], "--k"),
        (["topk", "--curvature", curvature, "--generate", "2", "--k", "-1"], "--k"),
        (["topk", "--curvature", curvature, "--generate", "0"], "--generate"),
        (["topk", "--curvature", curvature, "--generate", "2", "--damping", "inf"], "--damping"),
        (["topk", "--curvature", curvature, "--generate", "2", "--damping", "nan"], "--damping"),
        (["topk", "--curvature", curvature, "--generate", "2", "--exact-rerank", "4"], "--index"),
        (["topk", "--curvature", curvature, "--generate", "2", "--rerank-sigmas", "1"], "--index"),
        (
            ["topk", "--curvature", curvature, "--generate", "2", "--index", str(tmp / "none")],
            "--index",
        ),
        (["topk", "--curvature", curvature, "--generate", "2", "--out", str(tmp)], "--out"),
        (["fit", "--out", str(tmp / "a_file")], "--out"),
        (["fit", "--out", curvature], "--force"),
        (["fit", "--out", str(tmp / "new"), "--weights", str(tmp / "w.safetensors")], "--weights"),
        (["fit", "--out", str(tmp / "new"), "--data", str(tmp / "a_file")], "--data"),
        (["fit", "--out", str(tmp / "new"), "--factor-draws", "0"], "--factor-draws"),
        (["index", "--curvature", curvature, "--out", str(tmp / "a_file")], "--out"),
        (["index", "--curvature", curvature, "--out", str(tmp / "i"), "--dim", "0"], "--dim"),
        (["train", "--out", str(tmp / "weights")], "--force"),
        (["lds", "--run-dir", str(tmp / "a_file")], "--run-dir"),
        (["lds", "--run-dir", str(tmp / "r"), "--num-train", "0"], "--num-train"),
        (["lds", "--run-dir", str(tmp / "r"), "--workers", "0"], "--workers"),
        (["lds", "--run-dir", str(tmp / "r"), "--fraction", "1.5"], "--fraction"),
        (["lds", "--run-dir", str(tmp / "r"), "--methods", "ekfac,magic"], "--methods"),
        (["demo", "--k", "0"], "--k"),
    ]


def test_bad_inputs_are_refused_at_once_in_one_line_without_touching_files(tmp_path):
    cases = bad_inputs(tmp_path)
    before = tree_digest(tmp_path)
    for args, option in cases:
        code, error, loaded = run_cli(*args)
        assert code == 2, (args, error)
        lines = [line for line in error.splitlines() if not line.startswith(("usage:", " "))]
        assert len(lines) == 1 and option in lines[0], (args, error)
        assert "Traceback" not in error and loaded == [], (args, error, loaded)
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "curvature", "weights"]


def _actions(parser: argparse.ArgumentParser):
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, sub, action


def test_every_option_has_help_and_every_command_an_example():
    parser = build_parser()
    missing = [f"{name} {action.dest}" for name, _, action in _actions(parser) if not action.help]
    assert missing == []
    for name, sub, _ in _actions(parser):
        assert sub.epilog and sub.epilog.startswith("example:\n  fastinf " + name), name
    strategy = next(a for n, _, a in _actions(parser) if n == "fit" and a.dest == "strategy")
    assert list(strategy.choices) == list(STRATEGY_NAMES)


def test_readme_names_only_options_the_parser_knows():
    parser = build_parser()
    known: dict[str, set[str]] = {}
    for name, _, action in _actions(parser):
        known.setdefault(name, set()).update(action.option_strings)
    used = re.findall(r"fastinf (\w+)((?: [^\n`|]*)?)", README.read_text())
    checked = 0
    for command, rest in used:
        if command not in known:
            continue
        for option in re.findall(r"(--[a-z][a-z-]*)", rest):
            assert option in known[command], f"README: fastinf {command} {option}"
            checked += 1
    assert checked > 10
