from livemig.actors.coordinator.control import main

main()
