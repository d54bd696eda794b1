"""`ConfirmScreen`: a modal question with a few choices; dismisses with the chosen
choice's id, or None for the last (safe) one and for escape."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


@dataclass(frozen=True)
class Choice:
    id: str
    label: str
    variant: str = "default"  # a Button variant: default, primary, warning, error


class ConfirmScreen(ModalScreen[str | None]):
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: auto; max-width: 76; height: auto; border: thick $error; background: $surface; padding: 0 1;
    }
    ConfirmScreen #question { width: auto; max-width: 72; margin: 0 0 1 0; }
    ConfirmScreen Horizontal { width: auto; height: auto; }
    ConfirmScreen Button { margin: 0 1 0 0; min-width: 10; }
    """
    BINDINGS = [Binding("escape", "dismiss_none", "Back"), Binding("n", "dismiss_none", "No", show=False)]

    def __init__(self, question: str, choices: list[Choice], back: str = "Back") -> None:
        super().__init__()
        self.question = question
        self.choices = choices
        self.back = back

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question, id="question")
            with Horizontal():
                for choice in self.choices:
                    yield Button(choice.label, id=f"choice-{choice.id}", variant=choice.variant)  # type: ignore[arg-type]
                yield Button(self.back, id="back", variant="primary")

    def on_mount(self) -> None:
        # The safe answer has the focus: a stray Enter never cancels anything.
        self.query_one("#back", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        button_id = event.button.id or ""
        self.dismiss(button_id.removeprefix("choice-") if button_id.startswith("choice-") else None)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
