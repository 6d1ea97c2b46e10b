module synod/brokertests

go 1.22

require (
	github.com/rabbitmq/amqp091-go v1.10.0
	github.com/streadway/amqp v1.1.0
)
