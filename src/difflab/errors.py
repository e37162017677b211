"""The one exception type that reaches the user as a one-line message, how other errors'
text is quoted inside it, and the small helpers of message text."""

from __future__ import annotations

_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on


def one_line(text: str) -> str:
    """``text`` with line breaks escaped: a path typed with a newline stays on one line."""
    return "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in text)


def counted(number: int, noun: str) -> str:
    """``1 image``, ``3 images``: a number and its noun, plural unless it is 1."""
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def shorten(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at a word boundary and marked with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "..."


def brief(error: BaseException, limit: int = 160) -> str:
    """An underlying error as ``Type: its first line``, shortened to ``limit`` characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return shorten(" ".join(text.split()), limit)


class DifflabError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits non-zero.

    The message is made one line here, whatever text it quotes. Not a ``ValueError``: difflab
    turns libraries' ValueErrors into its own messages in several places, which must not
    catch these.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


def unknown_choice(kind: str, name: str, known) -> DifflabError:
    """The error for a name that is none of ``known``: it lists them."""
    return DifflabError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")
