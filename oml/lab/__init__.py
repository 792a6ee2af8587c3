"""The lab: sweeps, recipe selection and search, committed records, figures and reports."""
