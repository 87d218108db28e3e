"""IIOP test client: resolves a corbaloc URL, calls Demo::Greeter::echo and
prints the answer.

usage: client.py CORBALOC MESSAGE"""
import sys

from omniORB import CORBA
import Demo

orb = CORBA.ORB_init(["-ORBclientCallTimeOutPeriod", "30000"], CORBA.ORB_ID)
greeter = orb.string_to_object(sys.argv[1])._narrow(Demo.Greeter)
print(greeter.echo(sys.argv[2]))
orb.destroy()
