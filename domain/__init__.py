"""The registry's domain, in one home: its events, their fold, and the decisions that produce them.

* ``domain.events``: what happened to a model or a topic, as frozen tagged Structs.
* ``domain.projections``: the pure fold of the log into read models (the seed's
  ``LLM`` record, topic rooms, conversations).
* ``domain.decisions``: given the projections and a command, which events follow.
* ``domain.mapper``: domain events to the store's opaque ``(type, data)`` records
  and back; the only module here that knows ``storage``.

``handlers.registry`` is the application service on top: it reads files,
keeps the clock, appends what the decisions return and retries on conflict.
"""
