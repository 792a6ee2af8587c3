"""OML 1.0 fingerprinting: the code behind the five top-level scripts and the `oml` command (README.md, docs/).

One subpackage per stage of a fingerprint's life, each module one concern (its docstring says which):

    core/      errors, files (atomic writes, caches), logs, model_registry, data_files (generated_data/, strategy
               names), run_config (the argument spec, presets, the run hash), run_store (results/<hash>/), backends
               (one way to ask a model: the LanguageModel interface, its registry, the end-of-sequence set),
               greedy_decoding (the one batched greedy decoder for transformers), stage_settings (a stage's typed
               settings from the parsed flags)
    make/      fingerprint_files (every file format), prompt_encoding (a pair as tokens), fingerprint_generator
    measure/   fingerprint_check (teacher-forced verdicts; the check through any backend), transformers_backend ("hf"),
               likelihood_benchmarks, generation_measures (generative QA, chat drift), chat_sample, offline_questions,
               evaluation (the report), evaluation_cost (its time plan)
    embed/     run_setup (flags -> a run: digests and hash, after parsing), trainer, benign_rows, subnetworks, distributed
    attack/    attack_runner (fine-tune, casts, int8, merges), deployer_data, gguf_models (llama.cpp; the "gguf" backend),
               adaptive_host
    verify/    suspect_check (a served copy, key by key), api_client, api_backend ("api"), key_ledger, sequential_test,
               local_server, commitment (Merkle root at training), claims (checkable by anyone)
    lab/       sweep, figures, persistence_report, recipe_selection, recipe_search, records (committed measurements)
    commands/  one module per `oml` verb (make_parser + main); cli.py dispatches `oml VERB`

Layers, lowest first: core, make, measure, embed, attack, verify, lab, commands. A module imports only from its own
layer or lower ones (tests/test_layout.py checks it). measure sits below embed because training measures its own
fingerprints (--stop_when_learned) with measure's check and draws benign rows from measure's offline questions.

Below the commands, the measure, attack and verify stages take the settings they use, not the parsed Namespace:
a frozen dataclass per stage (measure.evaluation.EvalSettings, attack.attack_runner.AttackSettings,
verify.suspect_check.CheckSettings; the run they name is a core.run_store.RunIdentity), built once in the
command's main by its from_args.
"""
