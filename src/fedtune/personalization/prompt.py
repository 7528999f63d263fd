"""``prompt`` (the survey's personalized prompts, pFedPrompt / FedAPT style): with
``model.peft`` a soft prompt, each client keeps its own prompt embedding; what else is tunable
(the classification head) is shared and averaged."""

from __future__ import annotations

from .base import KeyedPersonalization


class PersonalPrompt(KeyedPersonalization):
    name = "prompt"

    def keeps(self, name):
        return "prompt_encoder" in name
