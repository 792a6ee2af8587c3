"""Verifying a deployed copy: the suspect check through an API, its client, the ledger of revealed keys, the sequential test, the local server, commitments and claims."""
