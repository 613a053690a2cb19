#!/bin/sh
# `criu` on PATH: runs the CRIU bundle (images/criu/build.sh) through its own loader and libraries, so
# it works on any base image, whatever libc the image has.
bundle=/usr/local/lib/dynamo-snapshot/criu
exec "$bundle/ld.so" --library-path "$bundle/lib" "$bundle/criu" "$@"
