"""The request bodies of the API, as pydantic models: what FastAPI validates and what `/openapi.json` shows.

The error body is in errors.py, next to the code that builds it.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class _Req(BaseModel):
    # Fields the OpenAI API has but we do not act on (penalties, logprobs, user, …) are accepted and ignored,
    # as clients send them by default; the ones that would change the answer are checked in the handler.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Req):
    type: str = Field(description="Only `text` parts are understood.")
    text: Optional[str] = None


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Req):
    include_usage: bool = False


class GenParams(_Req):
    model: str = Field(description="Base model name, an adapter / run name, or a served registry ref "
                       "(`reviews@production`).",
                       max_length=256)
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy. Default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    max_tokens: Optional[int] = Field(None, ge=1, description="New tokens at most (capped by the server).")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings that end the answer.")
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1, description="Makes sampling reproducible.")
    min_tokens: Optional[int] = Field(None, ge=0, description="Extension (as in vLLM): no end-of-sequence before "
                                      "this many tokens.")
    n: Optional[int] = Field(1, description="Only 1 is supported.")
    stream: Optional[bool] = Field(False, description="Server-sent events, ending in `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = None


class ChatCompletionRequest(GenParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Alias of max_tokens.")


class CompletionRequest(GenParams):
    prompt: Union[str, list[str]] = Field(description="One prompt (a list of one is accepted).")
    echo: Optional[bool] = False


class ClassifyRequest(_Req):
    model: str = Field(max_length=256, description="A classification run's name.")
    input: Union[str, list[str]] = Field(validation_alias=AliasChoices("input", "texts"),
                                         description="One text or a list of texts (`texts` is accepted too).")


class FeedbackRequest(_Req):
    response_id: str = Field(max_length=64, description="The `id` of a chat completion or completion.")
    rating: Optional[int] = Field(None, ge=1, le=5, description="1 (bad) … 5 (good).")
    correction: Optional[str] = Field(None, max_length=100_000, description="The answer it should have given.")
    comment: Optional[str] = Field(None, max_length=10_000)
    user: Optional[str] = Field(None, max_length=128)


class AdapterRequest(_Req):
    action: Literal["load", "unload"] = Field("load", description="`load` also replaces an adapter of that name.")
    name: str = Field(max_length=128, description="Public name requests use in `model`.")
    path: Optional[str] = Field(None, max_length=4096,
                                description="For `load`: a run folder inside the server's workspace (or a run's "
                                "name), or a registered version `NAME:VERSION` / `NAME@ALIAS` (an alias is "
                                "then followed). Any other path is refused (403).")
