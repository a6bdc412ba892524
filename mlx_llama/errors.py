"""The one exception type for mistakes a user can make (and `Terminated`, for signals).

Everything a user can cause (a wrong path, a corrupt file, a bad request) raises
`MlxLlamaError` with a single line that names the problem and what to do about it. The CLI
prints that line and exits 1; the server turns it into an HTTP error. Anything else that
escapes is a bug in mlx-llama and keeps its traceback.
"""


class MlxLlamaError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do."""


def one_line(exc: BaseException) -> str:
    """A library's exception text folded onto one line, to quote inside an MlxLlamaError."""
    return " ".join(str(exc).split()) or type(exc).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C: every cleanup that Ctrl-C
    runs (a conversion's temporary folder, a prompt cache's partial file) runs for `kill`,
    `timeout` and a closed terminal too. Code that lets Ctrl-C stop only part of its work
    (the chat's current reply) lets this one through (installed by `cli.main`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
