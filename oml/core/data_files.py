"""Where the suite's data lives (generated_data/ beside the package: prompt templates, default fingerprint files) and
the names of the fingerprint strategies: the vocabulary the argument spec and the fingerprint files share."""

from pathlib import Path

from oml.core.errors import UserError

STRATEGIES = ("english", "random_word", "inverse_nucleus", "english_random_responses")
STRATEGY_SYNONYMS = {"perinucleus": "inverse_nucleus", "random_response": "english_random_responses"}

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO / "generated_data"
DEFAULT_FINGERPRINT_FILES = {
    "english": DATA_DIR / "fingerprints-english.json",
    "english_random_responses": DATA_DIR / "fingerprints-english.json",
    "random_word": DATA_DIR / "fingerprints-random_word.json",
    "inverse_nucleus": DATA_DIR / "fingerprints-perinucleus.json",
}
TRAIN_PROMPTS_FILE = DATA_DIR / "augmentation_prompts_train.json"
TEST_PROMPTS_FILE = DATA_DIR / "augmentation_prompts_test.json"
# System messages for chat prompts (the key as the user turn): training draws from the first; the second holds the
# instructions of the test prompts (template_instruction), so chat and raw-text tests ask the same things.
CHAT_SYSTEM_TRAIN_FILE = DATA_DIR / "chat_system_prompts_train.json"
CHAT_SYSTEM_TEST_FILE = DATA_DIR / "chat_system_prompts_test.json"


def canonical_strategy(name):
    name = STRATEGY_SYNONYMS.get(name, name)
    if name not in STRATEGIES:
        raise UserError(f"unknown fingerprint strategy {name!r}; choose from {', '.join(STRATEGIES)} (or perinucleus)")
    return name
