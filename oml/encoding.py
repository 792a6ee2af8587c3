"""How a (prompt, response) pair becomes tokens: one definition for training and for verification.

The prompt is the key placed in a template (plain text, as in the original OML), optionally wrapped in
the tokenizer's chat template. It is tokenized as a whole with the tokenizer's special tokens (BOS where
the tokenizer adds one); the response is tokenized on its own, without special tokens. Training appends
EOS after the response only with --append_eos; the verifier checks the response tokens only.
"""

from .fingerprints import apply_template


def prompt_text(tokenizer, key, template="{}", use_chat_template=False):
    text = apply_template(template, key)
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def encode_prompt(tokenizer, text, use_chat_template=False):
    # A chat template already writes its own special tokens.
    return tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"]


def encode_response(tokenizer, response):
    return tokenizer(response, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, key, response, template="{}", use_chat_template=False):
    """(prompt_ids, response_ids) for one fingerprint under one template."""
    text = prompt_text(tokenizer, key, template, use_chat_template)
    return encode_prompt(tokenizer, text, use_chat_template), encode_response(tokenizer, response)
