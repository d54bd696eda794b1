"""`FilterBar`: the one-line filter input opened by `/`; words match job facts
(stage, role, r<rank>, a<attempt>, job id, node, state, reason)."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input


class FilterBar(Input):
    DEFAULT_CSS = """
    FilterBar { height: 1; border: none; padding: 0 1; display: none; }
    FilterBar.-open { display: block; }
    """
    BINDINGS = [Binding("escape", "close", "Close filter", show=False)]

    class Closed(Message):
        """The user left the filter: `cleared` when escape emptied it."""

        def __init__(self, cleared: bool) -> None:
            self.cleared = cleared
            super().__init__()

    def __init__(self, **kwargs: object) -> None:
        super().__init__(placeholder="filter jobs: stage role r<rank> node state… (enter keeps, esc clears)", **kwargs)  # type: ignore[arg-type]

    def open(self) -> None:
        self.add_class("-open")
        self.focus()

    def action_close(self) -> None:
        self.value = ""
        self.remove_class("-open")
        self.post_message(self.Closed(cleared=True))

    async def action_submit(self) -> None:
        await super().action_submit()
        self.remove_class("-open")
        self.post_message(self.Closed(cleared=False))
