"""Chat models: calibration text that goes through the tokenizer's chat template.

A chat model calibrated on plain text only can lose what it needs at the end of a turn (a pruned
SmolLM2-135M-Instruct then answers a chat prompt with an immediate end-of-turn). When the tokenizer has a chat
template, self-calibration therefore samples *conversations*: a user prompt drawn from `SEED_PROMPTS`, formatted
with `apply_chat_template`, then the model's own reply, then the next conversation, until the sequence is full; and
a .jsonl file whose records hold `messages` is calibrated on through the same template.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Union

from ..errors import InputError

CHAT_MODES = ("auto", "on", "off")
#: a reply longer than this is closed by the template's end-of-turn (a sequence holds several conversations)
MAX_REPLY_TOKENS = 256
_SENTINEL = "D2PRUNE-REPLY-SENTINEL"

#: the user turns that open self-generated conversations: varied tasks (questions, explanations, writing, code,
#: maths, advice, lists, rewriting, short and long answers) so that the replies cover what a chat model is used for.
SEED_PROMPTS = (
    "What is the capital of Australia?",
    "Explain photosynthesis in simple terms.",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "What are three tips for better sleep?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Translate 'Good morning, how are you?' into French.",
    "What is the difference between weather and climate?",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is 17 multiplied by 23?",
    "How does a refrigerator keep food cold?",
    "Can you suggest a name for a small bakery?",
    "Explain what a black hole is to a ten-year-old.",
    "List five fruits that are high in vitamin C.",
    "What causes earthquakes?",
    "Write a polite email declining a meeting invitation.",
    "How can I improve my public speaking skills?",
    "What is the Pythagorean theorem?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a weekend hiking trip?",
    "Describe the water cycle.",
    "How do vaccines work?",
    "Write a SQL query that counts the rows of a table named orders.",
    "What is the difference between a virus and a bacterium?",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "Who wrote 'Pride and Prejudice'?",
    "How do I make a cup of green tea?",
    "Explain the difference between 'affect' and 'effect'.",
    "What are the main causes of climate change?",
    "Write a short story opening about a lost key.",
    "How many continents are there, and what are they?",
    "What is machine learning?",
    "Suggest a weekly exercise plan for a beginner.",
    "Why do cats purr?",
    "How do I calculate the area of a circle?",
    "Rewrite this sentence more formally: 'We gotta fix this bug asap.'",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Explain how a bill becomes a law, briefly.",
    "What are some good habits for studying?",
    "Write a JavaScript function that adds two numbers.",
    "What is inflation?",
    "Describe a sunset in three sentences.",
    "How do plants know which way is up?",
    "Give me a motivational quote and explain it.",
    "What is the largest mammal on Earth?",
    "How should I prepare for a job interview?",
    "Explain what DNA is.",
    "What is the difference between a simile and a metaphor?",
    "Plan a one-day visit to Paris.",
    "How does the internet work, in a few sentences?",
    "Is it healthy to drink coffee every day?",
    "Write a limerick about a cat who loves to cook.",
    "What is the square root of 144?",
    "How can I save money on groceries?",
    "What is the role of the heart in the human body?",
    "Hi! How are you today?",
    "Can you help me write a thank-you note to my teacher?",
    "What are the planets of the solar system, in order?",
    "Explain recursion with a simple example.",
    "What is a good way to learn a new language?",
)


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, what: str) -> None:
    if not has_chat_template(tokenizer):
        raise InputError(f"{what} needs a tokenizer with a chat template, and this one has none: use a chat model's "
                         "tokenizer, or plain-text data (`text` records; `--chat-template off` for self-generated "
                         "text).")


def resolve_chat(mode: Union[str, bool, None], tokenizer: Any) -> bool:
    """Whether self-generated text is conversations: `auto`/None (when the tokenizer has a chat template), `on`/True
    (refused without one) or `off`/False."""
    if mode in (None, "auto"):
        return has_chat_template(tokenizer)
    if mode in (True, "on"):
        require_chat_template(tokenizer, "`--chat-template on`")
        return True
    if mode in (False, "off"):
        return False
    raise InputError(f"`chat` / --chat-template must be one of {CHAT_MODES}, got {mode!r}.")


def render_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text of a conversation through the tokenizer's chat template (special tokens are part of the text)."""
    require_chat_template(tokenizer, "a `messages` record")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # noqa: BLE001 - a template refusing the conversation (roles out of order, ...)
        raise InputError(f"the chat template cannot render this conversation ({type(err).__name__}: {err}).") from err


class ChatScript:
    """The token ids the template puts around each self-generated reply.

    `opening(rng)` is a new conversation up to where the assistant speaks (a random seed prompt); `closing` is what
    ends a reply (the end-of-turn). A reply ends when the model samples an end token (`stop_ids`) or reaches
    `MAX_REPLY_TOKENS`; its last token is then `closing[0]`, followed by the rest of `closing` and the next opening.
    """

    def __init__(self, tokenizer: Any, extra_stop_ids: Optional[list[int]] = None) -> None:
        require_chat_template(tokenizer, "Self-generated conversations")
        self.tokenizer = tokenizer
        probe = "Hello."
        finished = tokenizer.apply_chat_template([{"role": "user", "content": probe},
                                                  {"role": "assistant", "content": _SENTINEL}], tokenize=False)
        cut = finished.rfind(_SENTINEL)
        closing_text = finished[cut + len(_SENTINEL) :] if cut >= 0 else ""
        self.closing = self._ids(closing_text) if closing_text.strip() else []
        if not self.closing:
            if tokenizer.eos_token_id is None:
                raise InputError("The chat template marks no end of a reply and the tokenizer has no EOS token: "
                                 "use `--chat-template off`.")
            self.closing = [tokenizer.eos_token_id]
        self.stop_ids = {self.closing[0], *(extra_stop_ids or [])}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self._openings: dict[int, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def opening(self, rng: random.Random) -> list[int]:
        index = rng.randrange(len(SEED_PROMPTS))
        if index not in self._openings:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": SEED_PROMPTS[index]}],
                                                      tokenize=False, add_generation_prompt=True)
            self._openings[index] = self._ids(text)
        return self._openings[index]
