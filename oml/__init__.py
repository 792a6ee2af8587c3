"""OML 1.0 fingerprinting: the code behind the five top-level scripts and the `oml` command (README.md, docs/).

A map, in the order a fingerprint lives:

    cli, commands/      the `oml VERB` entry point and one module per verb (make, train, eval, attack, check)
    generate            make: english, random-word and perinucleus fingerprints; fingerprints reads every file format
    args, train         embed: the shared argument spec and run hash; fine-tuning, averaging, benign rows (benign),
                        sub-networks (subnet), several ranks and nodes (distributed); models: which model a run means
    runs, commitment    the run folder results/<hash>/ and its commitment to the fingerprints
    evaluate            measure: verify (fingerprints under every template), utility, generation (generative benchmark,
                        chat drift), chat (the chat check); eval_cost: the time plan printed before an evaluation
    attacks             attack: fine-tuning (attack_data), casts, int8, GGUF (gguf), merges; persistence: their table
    check               verify a served copy: api (requests, match rule), verdict (p0, sequential test), ledger,
                        claim (claims anyone can check); serve: a local server for tests; host: an adaptive
                        host's serving-time filters (what a deployer may put in front of a copy)
    sweep, plots        launch_multigpu.sh's steps and the figures; capacity, search, records: the experiments
    encoding, io, logs, errors, qa_data   shared pieces: prompt encoding, atomic files, logs, one-line errors, data
"""
