"""Errors that carry one sentence meant for a person.

Everything a user can get wrong (a bad size, an unknown model name, an unreadable image) raises
`UserInputError`.  The CLI prints its message and exits non-zero without a traceback; the Gradio
app turns it into `gr.Error`.  Anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """A mistake in what the user sent; `str(error)` is one clear sentence."""
