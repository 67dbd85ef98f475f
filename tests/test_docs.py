"""Every code block of README.md and docs/ runs, on a tiny model where the real one is too large.

Blocks are read from the Markdown files; each command or snippet is run with the substitutions of `SUBSTITUTIONS`
(Hub models -> a tiny saved LLaMA with a real tokenizer, Hub datasets -> a local text file, 8 GPUs -> 2 gloo ranks,
paper-sized calibration -> a few short sequences). What cannot run here is still checked: a `pip install` names
extras that exist, the test command is the one CI runs, a benchmark command's flags are flags of that script.
A new kind of command in the docs fails this test until it says how to run it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RUNNABLE = ("python", "bash")

#: text in the docs -> what the tests run instead ({tiny}, {text}, {jsonl} are filled per run)
SUBSTITUTIONS = [
    ("meta-llama/Llama-2-70b-hf", "{tiny}"), ("meta-llama/Llama-2-7b-hf", "{tiny}"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "{tiny}"), ("HuggingFaceTB/SmolLM2-135M", "{tiny}"),
    ("--model smollm2", "--model {tiny}"), ("./my-model", "{tiny}"),
    ("--calibration c4_sample.jsonl", "--calibration {jsonl}"), ("--calibration c4", "--calibration {jsonl}"),
    ('get_calibration_dataset("c4"', 'get_calibration_dataset("{jsonl}"'),
    ("--eval wikitext2_test.txt", "--eval {text}"), ("--eval wikitext2", "--eval {text}"),
    ("my_corpus.jsonl", "{jsonl}"), ("my_heldout.txt", "{text}"),
    ("--nproc-per-node 8", "--nproc-per-node 2"),
    ("num_samples=128, seq_len=2048", "num_samples=4, seq_len=32"),
    ("num_samples=32, seq_len=512", "num_samples=4, seq_len=32"),
    ("seq_len=512", "seq_len=32"),
]
#: appended to every command-line run: sizes a tiny model and a 4-kilobyte text can give
SMALL_RUN = ["--num-samples", "4", "--seq-len", "32"]


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                if start is None:
                    start, language = number, line[3:].strip()
                else:
                    blocks.append(Block(path, start, language, "\n".join(lines[start:number - 1])))
                    start = None
    return blocks


BLOCKS = code_blocks()


def test_every_block_says_its_language():
    """A block without a language cannot be run or checked: `text` for diagrams, else python/bash."""
    unnamed = [b.id for b in BLOCKS if not b.language]
    assert not unnamed, f"code blocks without a language: {unnamed}"


def commands(code: str) -> list[str]:
    """The shell commands of a bash block (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
        out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


@pytest.fixture
def files(tiny_checkpoint, tmp_path) -> dict[str, str]:
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text((FIXTURES / "pruning_notes.jsonl").read_text(encoding="utf-8") * 3, encoding="utf-8")
    text = tmp_path / "notes.txt"
    text.write_text((FIXTURES / "pruning_notes.txt").read_text(encoding="utf-8") * 3, encoding="utf-8")
    return {"tiny": str(tiny_checkpoint), "jsonl": str(jsonl), "text": str(text)}


def _format(text: str, files: dict[str, str]) -> str:
    for old, new in SUBSTITUTIONS:
        text = text.replace(old, new)
    for key, value in files.items():
        text = text.replace("{" + key + "}", value)
    return text


@contextlib.contextmanager
def hub_api():
    """The real `HfApi`, autospecced: a push is made and recorded, nothing leaves the machine."""
    from huggingface_hub import HfApi

    api = mock.create_autospec(HfApi, instance=True)
    api.whoami.return_value = {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}}
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/commit/0")
    with mock.patch("huggingface_hub.HfApi", return_value=api), \
            mock.patch("optimum_d2prune.io.hub.hub_offline_reason", return_value=None), \
            mock.patch.dict(os.environ, {"HF_TOKEN": "hf_test"}):
        yield api


def small(words: list[str]) -> list[str]:
    """The command's words with sizes a tiny model and a short text can give (the last occurrence of a flag wins)."""
    evaluation = words[words.index("--eval") + 1] if "--eval" in words else "self"
    extra = {"self": ["--eval-samples", "2"], "none": []}.get(evaluation, ["--eval-max-windows", "2"])
    extra += [] if evaluation == "none" else ["--eval-seq-len", "32"]
    extra += ["--zero-shot-limit", "2"] if "--zero-shot" in words else []  # a few examples of each task
    return [*words, *SMALL_RUN, *extra]


def run_cli(words: list[str], cwd: Path) -> None:
    from optimum_d2prune.commands.d2prune import main

    with contextlib.chdir(cwd), hub_api() if "--push-to-hub" in words else contextlib.nullcontext():
        assert main(small(words)) == 0


def run_command(command: str, files: dict[str, str], cwd: Path) -> None:
    words = shlex.split(_format(command, files))
    if words[:2] == ["optimum-cli", "d2prune"]:
        run_cli(words[2:], cwd)
    elif words[:3] == ["python", "-m", "optimum_d2prune"]:
        run_cli(words[3:], cwd)
    elif words[0] == "torchrun":
        nproc = words.index("--nproc-per-node")
        rest = words[nproc + 2:]
        assert rest[:2] == ["-m", "optimum_d2prune"], command
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *words[nproc:nproc + 2],
                                 *small(rest)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    elif words[:2] == ["pip", "install"]:
        check_pip(words[2:])
    elif words[:3] == ["python", "-m", "pytest"]:
        ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
        assert re.search(r"python -m pytest -q\b", ci), "the README's test command is not the one CI runs"
    elif words[0] == "python" and words[1].startswith("benchmarks/"):
        check_benchmark(words[1:])
    elif words[:2] in (["mkdocs", "serve"], ["mkdocs", "build"]):
        assert (ROOT / "mkdocs.yml").is_file()
    else:
        raise AssertionError(f"no way to run this documented command: {command!r}")


def check_pip(words: list[str]) -> None:
    """The extras a documented install names exist in setup.cfg; pinned packages are what CI installs."""
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    declared = set(re.findall(r"^(\w[\w-]*) =", setup.split("[options.extras_require]")[1], re.M))
    for word in words:
        match = re.match(r'^-e\s*"?\.\[([\w,-]+)\]"?$|^"?\.\[([\w,-]+)\]"?$', word)
        if match:
            extras = (match.group(1) or match.group(2)).split(",")
            assert set(extras) <= declared, f"{word}: extras {set(extras) - declared} are not in setup.cfg"


def check_benchmark(words: list[str]) -> None:
    """The script exists and every flag the docs give it is one of its flags."""
    script = ROOT / words[0]
    assert script.is_file(), f"{words[0]} does not exist"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in [w for w in words[1:] if w.startswith("--")]:
        assert flag in result.stdout, f"{words[0]} has no flag {flag}"


#: what the python blocks of a file need besides themselves (names a reader has from elsewhere), and text they
#: name that the tests replace; the blocks of one file run in order in one namespace, as a reader reads them
PRELUDES = {
    "docs/hub.md": "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
                   "model = AutoModelForCausalLM.from_pretrained('{tiny}')\n"
                   "tokenizer = AutoTokenizer.from_pretrained('{tiny}')\n",
    "docs/vision.md": "import torch\n"
                      "from optimum_d2prune.testing.images import image_folder\n"
                      "image_folder('imagenet/train', classes=2, per_class=4, size=32)\n"
                      "val_loader = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]\n",
}
PYTHON_SUBSTITUTIONS = {
    "docs/hub.md": [('data_dir="zeroshot/", limit=200', 'data_dir="{zeroshot}", limit=2')],
    "docs/vision.md": [('timm.create_model("deit_base_patch16_224", pretrained=True)',
                        'timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, '
                        'depth=2, num_classes=2, pretrained_cfg_overlay={"input_size": (3, 32, 32)})'),
                       ("num_samples=128, batch_size=32", "num_samples=8, batch_size=4")],
}


@contextlib.contextmanager
def registries_restored():
    """Methods and adapters a documented example registers stay out of the other tests' registries."""
    from optimum_d2prune.architectures.base import MODEL_TYPE_TO_ADAPTER
    from optimum_d2prune.methods.registry import registered_methods

    saved = [(registry, dict(registry)) for registry in (registered_methods(), MODEL_TYPE_TO_ADAPTER)]
    try:
        yield
    finally:
        for registry, contents in saved:
            registry.clear()
            registry.update(contents)


def files_with_python() -> list[Path]:
    return sorted({b.path for b in BLOCKS if b.language == "python"})


def bash_blocks() -> list[Block]:
    return [b for b in BLOCKS if b.language == "bash"]


@pytest.mark.parametrize("block", bash_blocks(), ids=[b.id for b in bash_blocks()])
def test_documented_commands_run(block, files, tmp_path, request):
    if "--zero-shot" in block.code:  # zero-shot tasks come from the Hub or the local copies of the benchmark data
        files = {**files, "zeroshot": str(request.getfixturevalue("shared_data") / "zeroshot")}
    for command in commands(block.code):
        if "--zero-shot" in command and "--zero-shot-data" not in command:
            command += " --zero-shot-data zeroshot/"
        run_command(command.replace("--zero-shot-data zeroshot/", "--zero-shot-data {zeroshot}"), files, tmp_path)


@pytest.mark.parametrize("path", files_with_python(), ids=[str(p.relative_to(ROOT)) for p in files_with_python()])
def test_documented_python_runs(path, files, tmp_path, request):
    name = str(path.relative_to(ROOT))
    if name == "docs/hub.md":  # its zero-shot example reads the local copies of the tasks
        files = {**files, "zeroshot": str(request.getfixturevalue("shared_data") / "zeroshot")}
    namespace = {"__name__": "__docs__"}
    with contextlib.chdir(tmp_path), hub_api(), registries_restored():
        exec(compile(_format(PRELUDES.get(name, ""), files), f"{name} (prelude)", "exec"), namespace)
        for block in (b for b in BLOCKS if b.path == path and b.language == "python"):
            code = block.code
            for old, new in PYTHON_SUBSTITUTIONS.get(name, []):
                code = code.replace(old, new)
            exec(compile(_format(code, files), block.id, "exec"), namespace)
