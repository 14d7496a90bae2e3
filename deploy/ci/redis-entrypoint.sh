#!/bin/sh
# As the official redis image does: protected mode off, since compose's network is the boundary (Redis is never
# published). Without it, redis-server started without a config file refuses every client from another container.
set -e
if [ "$1" = redis-server ]; then
  shift
  set -- redis-server "$@" --protected-mode no
fi
exec "$@"
