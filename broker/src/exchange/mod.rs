//! Exchange routing: direct, fanout, topic, headers. Pure: no I/O.
