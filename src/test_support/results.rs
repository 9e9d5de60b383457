//! Submitting instructions to a [`Pipeline`] and waiting for their results.

use std::collections::{HashMap, HashSet};

use rdkafka::producer::FutureProducer;

use super::pipeline::Pipeline;
use super::wait::TIMEOUT;
use crate::contract::{Instruction, InstructionResult};
use crate::kafka::{self, ClientRole};
use crate::submit::{produce_instructions, ResultWatcher};

impl Pipeline {
    pub async fn producer(&self) -> FutureProducer {
        kafka::client_config(&self.kafka, ClientRole::Producer).create().unwrap()
    }

    /// Follows the results topic from now on.
    pub async fn watch_results(&self) -> ResultWatcher {
        let ks = self.kafka.clone();
        tokio::task::spawn_blocking(move || ResultWatcher::start(&ks)).await.unwrap().unwrap()
    }

    /// Produces instructions (acknowledged by Kafka) without waiting for their results.
    pub async fn submit(&self, instructions: &[Instruction]) {
        produce_instructions(&self.producer().await, &self.kafka.topics().instructions, instructions).await.unwrap();
    }

    /// Submits and waits for every result; returns them by id.
    pub async fn submit_and_wait(&mut self, instructions: &[Instruction]) -> HashMap<String, InstructionResult> {
        let watcher = self.watch_results().await;
        self.submit(instructions).await;
        self.await_results(watcher, instructions).await
    }

    /// Waits until `watcher` has seen a result for every instruction.
    pub async fn await_results(
        &mut self,
        watcher: ResultWatcher,
        instructions: &[Instruction],
    ) -> HashMap<String, InstructionResult> {
        let watcher = self.await_watcher(watcher, instructions).await;
        let results = watcher.results().clone();
        tokio::task::spawn_blocking(move || watcher.close()).await.unwrap();
        results
    }

    /// Waits until `watcher` has seen a result for every instruction; returns it open.
    pub async fn await_watcher(&mut self, mut watcher: ResultWatcher, instructions: &[Instruction]) -> ResultWatcher {
        let ids: HashSet<String> = instructions.iter().map(|i| i.instruction_id.clone()).collect();
        let (watcher, waited) = tokio::task::spawn_blocking(move || {
            let r = watcher.wait_for(&ids, TIMEOUT, |_| {});
            (watcher, r)
        })
        .await
        .unwrap();
        if let Err(e) = waited {
            if self.children.contains_key("executor") {
                self.assert_running("executor");
            }
            panic!("{e}");
        }
        watcher
    }
}
