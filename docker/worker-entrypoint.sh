#!/bin/sh
# Entrypoint of the worker image: `crispedit worker`, its options read from the environment.
#
# Why a script: an exec-form ENTRYPOINT ["crispedit", "worker", ...] cannot read variables, and a
# shell-form CMD after it would be passed to it as arguments. So the variables are mapped to flags
# here, and whatever is given as the container's command is appended to them, e.g.
#   docker run --gpus 1 crispedit-worker --burst
# The image sets defaults for the required variables (docker/worker.Dockerfile).
set -eu

# CRISPEDIT_BUILD_CURVATURE=1: build (or resume, or find) the capability curvature before taking
# jobs, so that the first edit does not wait for it.
case "${CRISPEDIT_BUILD_CURVATURE:-0}" in
    1 | true | yes) build_curvature=--build-curvature ;;
    0 | false | no | "") build_curvature= ;;
    *) echo "CRISPEDIT_BUILD_CURVATURE must be 1 or 0, not '$CRISPEDIT_BUILD_CURVATURE'" >&2; exit 2 ;;
esac

set -- \
    --model "${CRISPEDIT_MODEL:?set CRISPEDIT_MODEL: smollm2, a model folder, or a cached HF id}" \
    --store "${CRISPEDIT_STORE_DIR:?set CRISPEDIT_STORE_DIR: the store volume, shared with the API}" \
    --redis "${CRISPEDIT_REDIS_URL:?set CRISPEDIT_REDIS_URL: the Redis the API enqueues into}" \
    --device "${CRISPEDIT_DEVICE:-cuda}" \
    ${CRISPEDIT_MODEL_NAME:+--model-name "$CRISPEDIT_MODEL_NAME"} \
    ${CRISPEDIT_CORPUS:+--corpus "$CRISPEDIT_CORPUS"} \
    ${CRISPEDIT_TOKENS:+--tokens "$CRISPEDIT_TOKENS"} \
    ${CRISPEDIT_LAYERS:+--layers "$CRISPEDIT_LAYERS"} \
    ${build_curvature:+"$build_curvature"} \
    "$@"

# exec: the worker replaces this shell, so it receives `docker stop`'s SIGTERM itself and RQ's
# warm shutdown lets the current edit finish (docker-compose.yml gives it time to).
exec crispedit worker "$@"
