// Package brokertests drives synod-broker with real Go AMQP clients
// (github.com/rabbitmq/amqp091-go, and the older github.com/streadway/amqp)
// to prove RabbitMQ clients work unchanged. It has only tests; run them with
// scripts/test-go.sh, or with AMQP_URL set to check them against RabbitMQ.
package brokertests
