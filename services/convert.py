"""Proto messages <-> engine objects. Proto types stop here and never reach the engine."""
from __future__ import annotations

from splitserve.engine.constraint import Constraint, ConstraintKind
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.request import FinishReason, TokenLogprob
from splitserve.engine.sampling_params import SamplingParams
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import worker_pb2 as worker_pb

FINISH_TO_PROTO = {
    None: gen_pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: gen_pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: gen_pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: gen_pb.FINISH_REASON_ABORT,
}

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty")


def sampling_params_from_proto(msg: worker_pb.EngineRequest) -> SamplingParams:
    """Raises InvalidRequestError naming the field when a value is out of range."""
    sampling = {name: getattr(msg.sampling, name) for name in _SAMPLING_FIELDS if msg.sampling.HasField(name)}
    sampling.setdefault("temperature", 0.0)  # the API's default is greedy
    return SamplingParams(
        max_tokens=msg.max_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        logit_bias=tuple(msg.sampling.logit_bias.items()),
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        constraint=constraint_from_proto(msg.sampling.constraint) if msg.sampling.HasField("constraint") else None,
        **sampling,
    )


def constraint_from_proto(msg: gen_pb.Constraint) -> Constraint:
    """Raises InvalidRequestError naming the field when the constraint is malformed (not when it fails to compile)."""
    which = msg.WhichOneof("kind")
    if which is None:
        raise InvalidRequestError("sampling.constraint", "set one of json_schema, json_object, regex, choice, grammar")
    any_whitespace = not msg.disable_any_whitespace
    if which == "json_object":
        if not msg.json_object:
            raise InvalidRequestError("constraint.json_object", "must be true when set")
        return Constraint.json_object(any_whitespace)
    if which == "choice":
        return Constraint(ConstraintKind.CHOICE, choices=tuple(msg.choice.choices))
    return Constraint(ConstraintKind(which), getattr(msg, which), any_whitespace=any_whitespace)


def token_logprob_to_proto(token_id: int, logprob: TokenLogprob | None) -> gen_pb.TokenLogprob:
    if logprob is None:
        return gen_pb.TokenLogprob(token_id=token_id)
    top = [gen_pb.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top]
    return gen_pb.TokenLogprob(token_id=token_id, logprob=logprob.logprob, top=top)


def token_logprob_from_proto(msg: gen_pb.TokenLogprob, with_logprob: bool) -> TokenLogprob | None:
    if not with_logprob:
        return None
    return TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))
