"""oml.core.logs: run logs, and the libraries' known-noise warnings hushed by message, not by category."""

import warnings

from oml.core.logs import KNOWN_NOISE, quiet_libraries


def test_quiet_libraries_hushes_the_known_noise_and_nothing_else(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what quiet_libraries would set, restored after the test
    with warnings.catch_warnings(record=True) as seen:  # the filters come back on exit
        warnings.simplefilter("always")
        quiet_libraries()
        for message, category in [
            ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning),
            ("a deprecation nobody has seen yet", FutureWarning),
            ("something worth knowing", UserWarning),
        ]:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a deprecation nobody has seen yet", "something worth knowing"]
    assert all(message and category for category, message in KNOWN_NOISE)
