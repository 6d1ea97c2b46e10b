//! Request and response types of the management API, shared by the broker
//! (server side) and the operator (client side). Defined once, never twice.
