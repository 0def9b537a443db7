//! One integration-test binary: the sandbox through the library, the real `taskhost`
//! binary, and (with a redis-server it starts itself) the worker against Python Celery.

mod support;

mod amqp;
mod beat;
mod canvas;
mod capabilities;
mod chaos;
mod cli;
mod conformance;
mod fault_proxy;
mod first_run;
mod hardening;
mod interop;
mod monitoring;
mod network;
mod python_tasks;
mod readme;
mod reliability;
mod releases;
mod runtime;
mod semantics;
mod sentinel;
mod sql_backends;
mod tenants;
