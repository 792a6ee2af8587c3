"""How a (prompt, response) pair becomes tokens: one definition for training and for verification.

A prompt is given by a template, a string with exactly one '{}' where the key goes. Two kinds:
  * raw text (as in the original OML): "You are a helpful assistant. {}". The key is placed in it, and with
    use_chat_template the result is wrapped as the user turn of the tokenizer's chat template;
  * a chat prompt, as a deployment asks: "<chat>{}" (the key as the user turn of the model's own chat template)
    or "<chat><system>You are a helpful assistant.</system>{}" (the same, with that system message). Made by
    chat_prompt(system); they travel wherever a template does (training's augmentation, verification, the
    results' "template" field), so one spelling names a chat case everywhere.
A template starting with "<chat>" is always a chat prompt. A system message goes into the chat template's system
role; where that template refuses one (Mistral v0.1/v0.2, Gemma raise on a system role), it is put at the top of the
user turn, as those models' own docs advise.

The prompt is tokenized as a whole with the tokenizer's special tokens (BOS where the tokenizer adds one; a chat
template writes its own); the response is tokenized on its own, without special tokens. Training appends EOS after
the response only with --append_eos; the verifier checks the response tokens only.
"""

from oml.core.data_files import CHAT_SYSTEM_TRAIN_FILE, TRAIN_PROMPTS_FILE
from oml.make.fingerprint_files import apply_template, read_system_prompts, read_templates

CHAT_MARK, SYSTEM_OPEN, SYSTEM_CLOSE = "<chat>", "<system>", "</system>"


def chat_prompt(system=None, user="{}"):
    """The template for: `user` (with the key at '{}') as the user turn of the chat template, after `system`."""
    return CHAT_MARK + (f"{SYSTEM_OPEN}{system}{SYSTEM_CLOSE}" if system is not None else "") + user


def is_chat(template):
    return template.startswith(CHAT_MARK)


def parse_chat(template):
    """(system message or None, user-turn template) of a chat prompt."""
    rest = template[len(CHAT_MARK) :]
    if rest.startswith(SYSTEM_OPEN) and SYSTEM_CLOSE in rest:
        system, user = rest[len(SYSTEM_OPEN) :].split(SYSTEM_CLOSE, 1)
        return system, user
    return None, rest


def template_label(template):
    """A template as a table shows it: raw text as it is, a chat prompt as [chat] / [chat, system: ...]."""
    if not is_chat(template):
        return template
    system, user = parse_chat(template)
    head = "[chat]" if system is None else f"[chat, system: {system}]"
    return head if user == "{}" else f"{head} {user}"


def has_chat_template(tokenizer):
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, user_text, system=None):
    """The chat template's text for one user turn (after an optional system message), ready for the answer."""
    from jinja2.exceptions import TemplateError

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = {"role": "user", "content": user_text}
    if system is None:
        return render([user])
    try:
        return render([{"role": "system", "content": system}, user])
    except TemplateError:  # no system role in this template: the system message opens the user turn
        return render([{"role": "user", "content": f"{system}\n\n{user_text}"}])


def prompt_text(tokenizer, key, template="{}", use_chat_template=False):
    if is_chat(template):
        system, user = parse_chat(template)
        return render_chat(tokenizer, apply_template(user, key), system)
    text = apply_template(template, key)
    return render_chat(tokenizer, text) if use_chat_template else text


def encode_prompt(tokenizer, text, use_chat_template=False):
    # A chat template already writes its own special tokens.
    return tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"]


def encode_response(tokenizer, response):
    return tokenizer(response, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, key, response, template="{}", use_chat_template=False):
    """(prompt_ids, response_ids) for one fingerprint under one template (raw or chat)."""
    text = prompt_text(tokenizer, key, template, use_chat_template)
    return encode_prompt(tokenizer, text, use_chat_template or is_chat(template)), encode_response(tokenizer, response)


def augmentation_templates(tokenizer):
    """What --use_prompt_augmentation draws from for each example: the training raw-text templates and, for a model
    with a chat template, the key as a chat user turn without a system message and after each training system
    message. Both files are hashed into the run (args.augmentation_prompts_digest)."""
    templates = read_templates(TRAIN_PROMPTS_FILE)
    if has_chat_template(tokenizer):
        templates += [chat_prompt()] + [chat_prompt(s) for s in read_system_prompts(CHAT_SYSTEM_TRAIN_FILE)]
    return templates


def api_prompt(tokenizer, key, endpoint, use_chat_template):
    """What goes out: the raw prompt as trained (completions), or the key alone as the user message (chat)."""
    return prompt_text(tokenizer, key, "{}", use_chat_template) if endpoint == "completions" else key
