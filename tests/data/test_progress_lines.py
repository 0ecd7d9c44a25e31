"""A long stage's progress reaches the flow's task log: run ``bertflow lm_baselines`` (tiny profile, real corpus
slice) through the flow's own ``stream`` (output a pipe, every line to the task logger) and read its lines."""

import re

from flows.pipeline import stream
from tests.conftest import REPO, copy_outputs, tiny_profile, write_params

LINE = re.compile(r"lm_baselines lstm: (\d+)% \| step (\d+)/20 \| [\d.]+ (?:steps/s|s/step) \| "
                  r"\S+ elapsed, ETA (\S+) \| loss [\d.]+$")


class TaskLog:
    """Stands in for Prefect's run logger: keeps what ``stream`` logs."""

    def __init__(self):
        self.lines = []

    def info(self, message, *args):
        self.lines.append(message % args if args else message)


def test_lm_baselines_progress_comes_out_as_lines_in_a_pipe(tiny_run, tmp_path):
    root = copy_outputs(tiny_run, tmp_path / "project")
    params = tiny_profile()
    params["lm_baselines"]["max_train_sentences"] = 2000  # seconds, not a minute, on a busy machine
    params["lm_baselines"]["lstm"]["max_steps"] = 20
    log = TaskLog()
    # options after the stage's name, as a user types them
    code, lines = stream(["bertflow", "lm_baselines", "--params", str(write_params(tmp_path, params)),
                          "--root", str(root)], REPO, log)
    assert code == 0, "\n".join(lines[-20:])
    assert log.lines == lines
    progress = [match for line in lines if (match := LINE.search(line))]
    # the first step, then each 10 % of the 20 steps: a line at least every few percent, with done/total and an ETA
    assert [int(m.group(2)) for m in progress] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert [int(m.group(1)) for m in progress][-1] == 100 and progress[-1].group(3) == "0s"
    assert any(re.search(r"lm_baselines lstm: done in \S+ \(step 20\)$", line) for line in lines)
    assert not any("\r" in line or "█" in line for line in lines)  # no terminal bar in a pipe
    assert (root / "reports" / "lm_baselines.json").is_file()
