//! The conformance suite on the embedded memory backend.

mod conformance;

conformance::suite!(memory_suite: "memory");
