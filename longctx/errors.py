"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class LongctxError(Exception):
    """A problem with the user's input or environment, stated with its fix.

    The message is one line: what is wrong and what to do about it. The CLI prints it
    as `longctx: error: <message>` and exits with status 2; no traceback.
    """
