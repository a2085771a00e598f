"""The commands' log lines: one per message on stderr, above a progress bar, and nothing left behind."""

import logging

from tqdm.auto import tqdm

from cat_engine.cat.logs import console_logging

log = logging.getLogger("cat_engine")


def test_one_line_per_message_on_stderr_also_under_a_progress_bar(capsys):
    before = (log.handlers[:], log.level, log.propagate)
    with console_logging():
        log.info("plain %s", "message")
        logging.getLogger("cat_engine.cat.dataset").warning("a child's warning")
        log.debug("not shown")
        with tqdm(total=3, desc="work") as bar:
            log.warning("during the bar")
            bar.update(1)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("cat-engine:")]
    assert lines == [
        "cat-engine: info: plain message",
        "cat-engine: warning: a child's warning",
        "cat-engine: warning: during the bar",
    ]
    assert "not shown" not in err
    assert (log.handlers, log.level, log.propagate) == before  # nothing left installed
