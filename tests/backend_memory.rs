//! The conformance suite on the embedded memory backend.

mod conformance;

#[tokio::test]
async fn memory_counts_match_the_oracle() {
    conformance::counts_match_the_oracle("memory").await;
}

#[tokio::test]
async fn memory_bad_input_goes_to_dead_letters() {
    conformance::bad_input_goes_to_dead_letters("memory").await;
}

#[tokio::test]
async fn memory_restart_loses_nothing() {
    let second_run = conformance::restart_loses_nothing("memory").await;
    // The crash left records of already-emitted windows above the committed position;
    // the checkpoint must have recognised and skipped them.
    assert!(second_run.replayed > 0, "{second_run:?}");
}

#[tokio::test]
async fn memory_idle_input_still_closes_the_last_window() {
    conformance::idle_input_still_closes_the_last_window("memory").await;
}

#[tokio::test]
async fn memory_hopping_windows_match_the_oracle() {
    conformance::hopping_windows_match_the_oracle("memory").await;
}

#[tokio::test]
async fn memory_session_windows_match_the_oracle() {
    conformance::session_windows_match_the_oracle("memory").await;
}

#[tokio::test]
async fn memory_enrichment_retries_until_profiles_arrive() {
    conformance::enrichment_retries_until_profiles_arrive("memory").await;
}

#[tokio::test]
async fn memory_fail_stops_and_a_restart_resumes_from_the_failing_record() {
    conformance::fail_stops_and_a_restart_resumes_from_the_failing_record("memory").await;
}

#[tokio::test]
async fn memory_retried_events_keep_their_event_time() {
    conformance::retried_events_keep_their_event_time("memory").await;
}

#[tokio::test]
async fn memory_waiting_retries_survive_a_restart() {
    conformance::waiting_retries_survive_a_restart("memory").await;
}

#[tokio::test]
async fn memory_start_before_data_is_exact() {
    conformance::start_before_data_is_exact("memory", true).await;
}

#[tokio::test]
async fn memory_start_before_unkeyed_data_is_exact() {
    conformance::start_before_data_is_exact("memory", false).await;
}

#[tokio::test]
async fn memory_a_future_event_cannot_stop_the_count() {
    conformance::a_future_event_cannot_stop_the_count("memory").await;
}
