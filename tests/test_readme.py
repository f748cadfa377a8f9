"""README.md stays true: every `python ...` command it shows uses flags that exist, and
every number in its results table is in the doc the row links, with its machine and date.

The commands are parsed, not run: each script's `--help` is read once and each flag the
README passes must be in it. (argparse acts on `--help` as soon as it meets it, so
appending `--help` to a command line alone would not catch a flag that does not exist.)
"""

import json
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}

# Commands a README shows that are not this project's Python entry points.
NOT_OURS = ("-m pytest", "-m venv", "-c ")


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def shown_commands(text):
    """Every `python ...` command in the README's code: fenced blocks, and indented
    example lines after a `$ ` prompt. Comments and `&&` chains are split off."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()  # continued lines joined
    lines += [m.group(1) for m in re.finditer(r"^ {4}\$ (.*)$", text, flags=re.M)]
    commands = []
    for line in lines:
        line = line.split(" #")[0].strip()
        for part in line.split("&&"):
            part = part.strip()
            if re.match(r"python(3[.\d]*)? ", part) and not any(k in part for k in NOT_OURS):
                commands.append(part)
    return commands


def entry_point(tokens):
    """(the argv that runs the command's program, its arguments)."""
    if tokens[1] == "-m":
        return [sys.executable, "-m", tokens[2]], tokens[3:]
    return [sys.executable, tokens[1]], tokens[2:]


def flags(args):
    return [a.split("=")[0] for a in args if a.startswith("--")]


def test_the_parser_finds_the_commands_it_must_check():
    # The check below is only as good as this parse: the quick start's commands, all of them.
    commands = shown_commands(_readme())
    programs = {" ".join(entry_point(shlex.split(c))[0][1:]) for c in commands}
    for program in ("train.py", "export.py", "serving/local_server.py", "-m serving.client",
                    "prepare.py", "make_cifar10_folder.py"):
        assert program in programs, (program, programs)
    assert any("--strategy mirrored" in c for c in commands)
    sample = "```bash\npython a.py --x 1 && python b.py --y  # note --z\n```\n    $ python -m c --w=3\n"
    assert shown_commands(sample) == ["python a.py --x 1", "python b.py --y", "python -m c --w=3"]
    assert flags(["--w=3", "x", "--y"]) == ["--w", "--y"]


_HELPS = {}

# Every program's `--help` in one process (many import TensorFlow before they parse:
# seconds per process on a 2-core CPU), each run as `python PROGRAM --help` runs it:
# its own sys.argv, sys.path[0] its folder (a script) or the working directory (-m).
_HELP_RUNNER = """
import contextlib, io, json, os, runpy, sys, traceback
results, path = {}, list(sys.path)
for program in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.path[:] = path  # what an earlier program inserted is gone
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if program[0] == "-m":
                sys.argv = [program[1], "--help"]
                runpy.run_module(program[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv, sys.path[0] = [program[0], "--help"], os.path.dirname(os.path.abspath(program[0]))
                runpy.run_path(program[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[" ".join(program)] = {"code": code, "stdout": out.getvalue()}
print(json.dumps(results))
"""


def _read_helps(programs):
    """Fill _HELPS for `programs` (argv lists from entry_point). A program whose --help
    fails or prints nothing in the shared process runs again in a process of its own,
    so what another program left behind there cannot fail (or pass) the check."""
    wanted = {" ".join(p[1:]): p for p in programs if " ".join(p[1:]) not in _HELPS}
    if not wanted:
        return
    shared = subprocess.run([sys.executable, "-c", _HELP_RUNNER, json.dumps([p[1:] for p in wanted.values()])],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = shared.stdout.strip().splitlines()
    results = json.loads(lines[-1]) if shared.returncode == 0 and lines else {}
    for key, program in wanted.items():
        result = results.get(key, {"code": None, "stdout": ""})
        if result["code"] != 0 or not result["stdout"].strip():
            proc = subprocess.run(program + ["--help"], cwd=REPO, env=ENV, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, f"{key} --help exited {proc.returncode}: {proc.stderr[-500:]}"
            result = {"stdout": proc.stdout}
        _HELPS[key] = result["stdout"]


def _commands(text):
    """(command, program argv, its arguments) for each command `text` shows."""
    return [(command, *entry_point(shlex.split(command.replace("$PWD", REPO)))) for command in shown_commands(text)]


def command_problems(readme_text):
    """Each flag a README command passes that its program's --help does not list."""
    commands = _commands(readme_text)
    _read_helps([program for _, program, _ in commands])
    missing = []
    for command, program, args in commands:
        for flag in flags(args):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _HELPS[" ".join(program[1:])]):
                missing.append(f"{command}: {flag}")
    return missing


def test_every_readme_command_uses_flags_its_program_has():
    missing = command_problems(_readme())
    assert not missing, "README commands with flags their program does not have:\n" + "\n".join(missing)


DOCS = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md")) + [
    "serving/README.md"]


def test_every_doc_command_uses_flags_its_program_has():
    # The same check on every page the README links: a newcomer follows those too.
    texts = {}
    for doc in DOCS:
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            texts[doc] = f.read()
    _read_helps([program for text in texts.values() for _, program, _ in _commands(text)])  # one process for all
    missing = []
    for doc, text in texts.items():
        missing += [f"{doc}: {m}" for m in command_problems(text)]
    assert not missing, "doc commands with flags their program does not have:\n" + "\n".join(missing)


def test_the_command_check_fails_on_a_flag_that_does_not_exist():
    text = _readme().replace("python train.py --dataset folder:PHOTOS ", "python train.py --datasets folder:PHOTOS ", 1)
    assert text != _readme()
    assert any(p.endswith(": --datasets") for p in command_problems(text))


def results_rows(text):
    """The README's results table: (result, measured on, linked file) per row."""
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("what", "---"):
            continue
        link = re.search(r"\]\(([^)#]+)(#[^)]*)?\)", cells[3])
        rows.append((cells[1], cells[2], link.group(1) if link else None, link.group(2) if link else None))
    return rows


def _numbers(text):
    return re.findall(r"\d[\d,]*(?:\.\d+)?", text)


def _flat(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return re.sub(r"\s+", " ", f.read())


def _anchors(markdown):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.*)$", markdown, flags=re.M)
    return {"#" + re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def results_problems(readme_text):
    """What the README's results table says that the doc each row links does not."""
    rows = results_rows(readme_text)
    problems = [] if len(rows) >= 5 else [f"only {len(rows)} rows"]
    for result, measured_on, target, anchor in rows:
        if target is None:
            problems.append(f"row without a link: {result}")
            continue
        with open(os.path.join(REPO, target), encoding="utf-8") as f:
            raw = f.read()
        doc = re.sub(r"\s+", " ", raw)
        if anchor and anchor not in _anchors(raw):
            problems.append(f"{target}{anchor}: no such heading")
        for number in _numbers(result):
            if not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", doc):
                problems.append(f"{target}: {number} (README: {result})")
        machine, date = measured_on.rsplit(", ", 1)
        for part in (machine, date):
            if part not in doc:
                problems.append(f"{target}: '{part}' (README: {measured_on})")
    return problems


def test_every_number_in_the_results_table_is_in_the_doc_it_links():
    problems = results_problems(_readme())
    assert not problems, "README results the linked doc does not bear out:\n" + "\n".join(problems)


def test_the_results_check_fails_on_a_number_a_machine_or_an_anchor_the_doc_lacks():
    text = _readme()
    result, measured_on, target, anchor = results_rows(text)[0]
    row = next(line for line in text.splitlines() if result in line)
    number = _numbers(result)[0]
    for wrong_row in (
        row.replace(result, result.replace(number, "0.9999", 1)),
        row.replace(measured_on, "2-core Intel Xeon, AMX, 2031-01-01"),
        row.replace(f"{target}{anchor}", f"{target}#no-such-heading"),
    ):
        wrong = text.replace(row, wrong_row)
        assert wrong != text
        assert results_problems(wrong)


def test_readme_reads_in_five_minutes():
    # About 1,500 words at most, code included (the limit for a newcomer's read).
    assert len(_readme().split()) <= 1500


def test_docs_name_no_path_of_the_development_machine():
    # A user has data/cifar10 (make_cifar10_folder.py), not this project's ../shared.
    hits = [f"{d}: {m}" for d in ["README.md"] + DOCS for m in re.findall(r"\S*\.\./shared\S*|/work/\S+", _flat(d))]
    assert not hits, hits
