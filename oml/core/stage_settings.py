"""Typed settings per stage: each stage below the scripts takes a frozen dataclass of the settings it uses (as trl's
configs are), built once in the command's main from the parsed and prepared arguments, never the whole Namespace.

settings_from_args(cls, args, **given) builds one: each field the dataclass lists is the argument of the same name,
unless `given` sets it (a derived value, or a field named apart from its flag).
"""

import dataclasses


def settings_from_args(cls, args, **given):
    """cls (a dataclass) with each of its fields from `given`, else from the argument of the same name in args."""
    names = {f.name for f in dataclasses.fields(cls)}
    if set(given) - names:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(set(given) - names)}")
    return cls(**{f.name: given[f.name] if f.name in given else getattr(args, f.name) for f in dataclasses.fields(cls)})
