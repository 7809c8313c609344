"""Form fields the admin shares: what the API takes as a JSON list, people type as words."""

from __future__ import annotations

from typing import Any

from django import forms


def words_text(words: Any) -> str:
    """A list of words as people read and type it: "fleet, cam" (anything else as is)."""
    if isinstance(words, list | tuple):
        return ", ".join(str(word) for word in words)
    return "" if words is None else str(words)


class WordsField(forms.CharField):
    """Words separated by commas ("fleet, cam") for a JSON list of strings (tags, device
    ids): blanks and repeats dropped, the order kept; each word at most ``max_word_length``
    characters, as the API's ``ListField(child=CharField(max_length=…))``."""

    def __init__(self, *, max_word_length: int = 64, **kwargs: Any) -> None:
        self.max_word_length = max_word_length
        kwargs.setdefault("required", False)
        kwargs.setdefault("help_text", "Separated by commas.")
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> str:
        return words_text(value)

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, list | tuple):
            value = words_text(value)
        text = super().to_python(value)
        return list(dict.fromkeys(word.strip() for word in text.split(",") if word.strip()))

    def validate(self, value: list[str]) -> None:
        if self.required and not value:
            raise forms.ValidationError(self.error_messages["required"], code="required")
        too_long = [word for word in value if len(word) > self.max_word_length]
        if too_long:
            raise forms.ValidationError(
                f"At most {self.max_word_length} characters a word: {too_long[0][:20]}… is longer.",
                code="word_too_long",
            )

    def run_validators(self, value: list[str]) -> None:
        for word in value:
            super().run_validators(word)  # CharField's own: no NUL character


def label_split_datetime(field: forms.Field, what: str) -> None:
    """The admin's date-and-time widget is two inputs under one label, which leaves both
    unnamed for screen readers (axe: "label"): name each, with the zone."""
    widgets = getattr(field.widget, "widgets", None)
    if widgets and len(widgets) == 2:
        widgets[0].attrs["aria-label"] = f"{what}: date (UTC)"
        widgets[1].attrs["aria-label"] = f"{what}: time (UTC)"
