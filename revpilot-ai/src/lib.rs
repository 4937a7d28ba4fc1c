//! LLM adapter for RevPilot: an OpenAI-compatible provider and the offline narrative behind
//! `revpilot-core`'s `LlmProvider` port; it is filled by the insights issue.
