"""Who may do what on the bus (docs/security.md).

* :mod:`bus.auth.credentials`: what a process logs in with (creds file, nkey, token, user and password,
  TLS), secrets read from files or the environment and never shown.
* :mod:`bus.auth.roles`: the three roles (service, admin, chat) as NATS permissions generated from the
  endpoint table; :func:`bus.auth.roles.grant` says which endpoints and topic actions a role may use.
* :mod:`bus.auth.embedded`: the embedded broker's users, with generated passwords in the data directory.

Nothing is imported here, so that a connection (bus/broker) can use the credentials without the roles.
"""
