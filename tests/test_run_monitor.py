"""The terminal view of a run: Snakemake's lines pass through, running jobs are followed, and each one's
progress is read from the bars in its log file."""

import io

from avatar_pipeline.run_monitor import RunMonitor, last_bar

JOB_START = """[Mon Nov 30 06:09:59 2026]
localrule avatar_train:
    input: results/u/crop, results/u/background, results/u/tracking
    output: results/u/avatars/t/train/done.json
    log: results/u/logs/avatar_train_t.log
    jobid: 9
    reason: Missing output files: results/u/avatars/t/train/done.json
    wildcards: subject=u, avatar=t
    threads: 2
Shell command: "python" -m avatar_pipeline avatar-train --settings '{"a very long": "json"}' > log 2>&1
"""
TRAIN_LOG = (
    "12:00:00 INFO nerface: 40 training frames\n"
    "nerface: train:   0%|          | 0/1500 [00:00<?, ?step/s]"
    "nerface: train:  35%|███▌      | 523/1500 [01:40<03:07,  5.20step/s, loss=0.0123, psnr=21.3]"
)


def _monitor(tmp_path, **kw):
    out = io.StringIO()
    return RunMonitor(out=out, workdir=tmp_path, live=False, **kw), out


def test_a_bar_is_read_with_its_counts_time_left_and_training_figures():
    bar = last_bar(TRAIN_LOG)
    assert (bar.desc, bar.n, bar.total, bar.left) == ("nerface: train", 523, 1500, "03:07")
    assert bar.describe() == "nerface: train 523/1500 03:07 left loss 0.0123 psnr 21.3"
    unknown_total = last_bar("crop: detect faces: 120frame [00:02, 50.1frame/s]")
    assert (unknown_total.n, unknown_total.total) == (120, None)
    assert last_bar("09:00:00 INFO nothing with a bar here\n") is None


def test_a_time_budget_shorter_than_the_steps_is_the_time_left():
    bar = last_bar("nerface: train:  5%|▌ | 75/1500 [00:30<09:30,  2.5step/s, loss=0.02, psnr=19.0, budget=4:30]")
    assert "4:30 left" in bar.describe() and "09:30" not in bar.describe()


def test_running_jobs_are_followed_and_their_progress_shown(tmp_path):
    (tmp_path / "results" / "u" / "logs").mkdir(parents=True)
    (tmp_path / "results" / "u" / "logs" / "avatar_train_t.log").write_text(TRAIN_LOG)
    monitor, out = _monitor(tmp_path)
    for line in JOB_START.splitlines(keepends=True):
        monitor.feed(line)
    assert "localrule avatar_train:" in out.getvalue() and "jobid: 9" in out.getvalue()
    assert "Shell command" not in out.getvalue()  # the long command stays in Snakemake's own log
    status = monitor.status()
    assert status.startswith("running 1: avatar_train[u/t] nerface: train 523/1500 03:07 left loss 0.0123 psnr 21.3")
    monitor.tick()
    monitor.tick()  # unchanged: printed once
    assert out.getvalue().count("[progress ") == 1
    monitor.feed("Finished jobid: 9 (Rule: avatar_train)\n")
    assert monitor.status() == ""


def test_a_job_without_a_bar_yet_and_a_failed_job(tmp_path):
    monitor, out = _monitor(tmp_path)
    for line in ["localrule crop:", "    log: results/x/logs/crop.log", "    jobid: 2", "    wildcards: subject=x", ""]:
        monitor.feed(line)
    assert monitor.status().startswith("running 1: crop[x] started (")
    for line in [
        "Error in rule crop:",
        "    message: None",
        "    jobid: 2",
        "    log: results/x/logs/crop.log (check log file(s) for error details)",
        "",
    ]:
        monitor.feed(line)
    assert monitor.running == {} and "Error in rule crop:" in out.getvalue()


def test_on_a_terminal_the_status_line_is_redrawn_under_the_output(tmp_path):
    (tmp_path / "crop.log").write_text("crop: write frames:  50%|█████     | 20/40 [00:01<00:01, 20.0frame/s]")
    out = io.StringIO()
    monitor = RunMonitor(out=out, workdir=tmp_path, live=True)
    for line in ["localrule crop:", "    log: crop.log", "    jobid: 1", "    wildcards: subject=x", ""]:
        monitor.feed(line)
    monitor.feed("Select jobs to execute...")
    text = out.getvalue()
    # every Snakemake line first clears the status line, then the status line is drawn again below it
    assert text.endswith(
        "\r\033[KSelect jobs to execute...\nrunning 1: crop[x] crop: write frames 20/40 00:01 left (0:00)"
    )
    monitor.stop()
    assert out.getvalue().endswith("\r\033[K")  # the terminal is left clean
